"""Diffusers pipelines built on converted models (installed as ``lindiff.pipelines``).

The high-resolution pipeline and the batch renderer live here; see the project issues for
their status.
"""
