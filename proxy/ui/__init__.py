"""The web pages under /ui/: owners' settings and reports, members' own usage (SPEC §14)."""
