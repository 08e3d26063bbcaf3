"""Tests of the export tool (a package, so basenames cannot clash with other test folders)."""
