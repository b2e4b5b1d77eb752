"""Input images (`images`), safe file writing (`files`), result pictures (`outputs`)."""
