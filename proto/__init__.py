"""gRPC stubs generated from kvwire.proto by `make proto`; only agent_common/edge_messages.py and the edge client import them."""
