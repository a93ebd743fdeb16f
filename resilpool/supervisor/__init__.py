"""The supervisor: limits, pure policy decisions, the sampling monitor, the crash-loop breaker."""
