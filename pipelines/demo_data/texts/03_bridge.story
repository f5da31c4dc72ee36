Engineers closed the old iron bridge for a week to replace its bearings. Traffic went round by the ring road, and the ferry, which had almost stopped running, carried more passengers than in any week since the bridge first opened. Some of them said they would keep taking it, even after the bridge is open again.

@highlight

Bridge repairs bring the ferry back to life
