"""Client-side tools: `quorum predict` and the image conversion it uses. Nothing here is
imported by the server."""
