"""Draft training: config schema, optimizer, the jitted train step, the loop and its CLI."""
