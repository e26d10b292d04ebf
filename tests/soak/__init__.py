"""The soak (issue 9, point 6): thousands of connections through one gateway process."""
