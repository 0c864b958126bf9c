"""Media files through ffmpeg: probe, decode, encode, stem folders, previews, upload plans."""
