"""Generated protobuf and gRPC stubs for the inkling.v1 contracts (protos/inkling/v1).

Never edit the *_pb2*.py(i) files by hand: change the .proto and run `make protos`.
"""
