"""Model definitions shared by the batch jobs and the servers (torch)."""

from inkling.models.sasrec import SasRecConfig, SasRecRecommender, ranks_of_targets

__all__ = ["SasRecConfig", "SasRecRecommender", "ranks_of_targets"]
