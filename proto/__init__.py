"""gRPC stubs generated from kvwire.proto by `make proto`; only edge_agent/messages.py and the edge client import them."""
