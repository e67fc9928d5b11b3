"""Tests of the project folder library (a package so its conftest does not shadow tests/conftest.py)."""
