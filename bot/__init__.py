"""The Discord adapter: commands, views, progress and delivery."""
