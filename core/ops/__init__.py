"""Running the bot: its web servers (downloads; health and metrics for operators), and event-loop lag."""
