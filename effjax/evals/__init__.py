"""Evaluation helpers: math grading and benchmark runners."""
