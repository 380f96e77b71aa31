"""Test-time data: corruptions applied on the fly (``imse.data.corruptions``)."""
