"""Helpers the tests share (imported as helpers.X: pytest puts tests/ on sys.path)."""
