"""Fake of A1111's `modules` package (v1.10.1) for tests; see ../README.md."""
