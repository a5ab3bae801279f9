"""Staging: copies of state dicts in reusable CPU (pinned or shared) memory, and tensor pickling."""
