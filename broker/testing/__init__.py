"""Loopback emulators of provider APIs and scripted fake providers, shipped so users can test offline."""
