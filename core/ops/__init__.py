"""Running the bot: the web server for health, metrics and downloads, and event-loop lag."""
