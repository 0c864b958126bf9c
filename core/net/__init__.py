"""Reaching outside: the guarded fetcher for user links, yt-dlp for streaming sites, URL helpers."""
