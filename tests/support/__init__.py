"""Test helpers that are no part of the product (the hostile test site)."""
