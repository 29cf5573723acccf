"""`broker deploy <provider>`: one module per provider."""
