"""Chaos testing for pools and the pipelines built on them (see docs/chaos.md)."""
