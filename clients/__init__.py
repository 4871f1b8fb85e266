"""Clients of the served models: ``grpc_batch`` pushes image sets through Triton over gRPC."""
