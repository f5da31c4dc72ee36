A storm moved across the coast overnight, bringing gusts that stripped leaves from the plane trees and sent bins rolling down the high street. By morning the wind had dropped, the sea was grey and flat, and residents were out with brooms. The council said power had been restored to all but a few streets on the hill.

@highlight

Overnight storm leaves a clean-up behind
