"""Tests of library.training, mirroring its modules."""
