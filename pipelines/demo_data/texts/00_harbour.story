The harbour woke slowly. Fishing boats that had left before dawn came back in a loose line, gulls circling above the decks, and the market hall filled with the smell of salt and diesel. By nine the first crates of mackerel had been sold, and the auctioneer's voice carried across the quay to the cafes where the crews sat with coffee.

@highlight

Fishing boats return at dawn and the market opens
