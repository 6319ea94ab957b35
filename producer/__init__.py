"""Producer: reads an image list and enqueues one sync job per image."""
