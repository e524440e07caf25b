"""Shared test set-up: a fixed hypothesis profile and the comparison helper."""

import os
import sys

import numpy as np
from hypothesis import HealthCheck, settings

# Tests import the working tree even before `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Property tests draw the same examples on every run (derandomize), so a red CI
# run always points at a real fault that reproduces locally.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", derandomize=False, deadline=None, max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
