"""Helpers the test suite shares: real servers on loopback ports and their fixtures."""
