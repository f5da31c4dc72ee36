The town library reopened on Monday after two years of repairs. The old reading room kept its oak tables and green lamps, but the roof now lets in daylight through a long glass spine. Volunteers carried back forty thousand books in labelled boxes, and the children's corner was full within an hour of the doors opening.

@highlight

Library reopens after a two-year restoration
