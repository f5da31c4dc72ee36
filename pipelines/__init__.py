"""Command line and end-to-end flows: the only package that composes the stages."""
