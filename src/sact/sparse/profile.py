"""Moved to :mod:`sact.tools.bench.profile`; this alias goes in the next release."""

from ..tools.bench.profile import (
    ForwardRecord,
    Profile,
    ProfilingExecutor,
    StageProfiler,
    StageRecord,
    profile_markdown,
    profile_sparse,
    summarize,
)

__all__ = ["ProfilingExecutor", "StageProfiler", "ForwardRecord", "StageRecord", "Profile", "profile_sparse",
           "summarize", "profile_markdown"]
