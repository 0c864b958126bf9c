"""stembot: split music into stems with Demucs; a Discord bot and a command line."""
