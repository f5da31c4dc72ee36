A bicycle workshop in the old dairy teaches teenagers to repair and rebuild donated frames. Each student leaves with a bike they built themselves, and many come back as volunteers. The founder keeps a wall of photographs of every bike that has left the workshop, more than six hundred so far.

@highlight

Teenagers rebuild donated bicycles
