"""Attribute keys that several modules write on trials: named once, imported everywhere."""

from __future__ import annotations

__all__ = ["LEASE_KEY", "TRIAL_STATE_ATTR", "UID_ATTR"]

#: the trial system attribute naming the lease (worker) that runs the trial
LEASE_KEY = "dendro.lease"
#: the trial user attribute that holds its state (for the dashboard, which shows user attributes)
TRIAL_STATE_ATTR = "dendro.state"
#: the study user attribute unique to each creation of a study (SQLite reuses a deleted study's id)
UID_ATTR = "dendro.uid"
