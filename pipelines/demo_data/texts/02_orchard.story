In late September the orchard on the hill is picked by hand. Apples go into wooden bins by variety, the bruised ones set aside for cider. The owner, who planted the first rows thirty years ago, says the trees give less in a dry summer but the fruit tastes sharper, and the pickers argue each year about which row is the best.

@highlight

Hand picking in a hillside orchard
