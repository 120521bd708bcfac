"""Integrations of dcm with serving engines; each is its own subpackage with an optional extra."""
