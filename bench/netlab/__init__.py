"""Network test harness: two namespaces joined by a shaped veth pair, their processes, and helper programs."""

from .namespaces import LinkSpec, Namespace, NetLab, NetlabUnavailable, Proc, netlab_fixture, sweep_stale

__all__ = ["LinkSpec", "NetLab", "NetlabUnavailable", "Namespace", "Proc", "netlab_fixture", "sweep_stale"]
