"""Test helpers and pytest plugins: real servers and processes the tests start on loopback."""
