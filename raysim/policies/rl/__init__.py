"""The learned policy ``rl``: features, critic, planning and the policy (the method: docs/rl.md)."""

from raysim.policies.rl.policy import Learned, rl

__all__ = ["Learned", "rl"]
