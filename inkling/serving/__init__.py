"""Server runtime shared by every inkling process."""
