"""Shared test set-up. Area-specific fixtures live in tests/<area>/conftest.py."""

import os

# No test may reach a model hub: everything is built in the test or committed as a fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
