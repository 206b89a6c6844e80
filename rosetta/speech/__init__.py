"""Speech recognition on the Whisper family: long-form transcription, decoding rules, word timestamps,
voice activity, subtitles."""
