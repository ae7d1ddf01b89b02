"""Helpers for tests and fuzzing: building guest programs, driver-side queue builders."""
