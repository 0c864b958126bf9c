"""Where job files live: local disk, S3 object storage, presigned transfers, signed download links."""
