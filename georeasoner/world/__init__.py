"""The embedded world: procedurally drawn street views whose country and city follow real clues."""
