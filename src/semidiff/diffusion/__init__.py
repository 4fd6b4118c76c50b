"""Diffusion pieces shared by the diffusion-based methods (Diff-CL's DS, ProtoDiff)."""

from __future__ import annotations

from semidiff.diffusion.label_diffusion import AVERAGES, LabelDiffusion, list_schedules

__all__ = ["AVERAGES", "LabelDiffusion", "list_schedules"]
