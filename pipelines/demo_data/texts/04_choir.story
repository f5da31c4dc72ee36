The community choir gave its winter concert in the railway station's main hall. Commuters stopped on their way to the platforms, some with suitcases, to hear carols and a new piece written by a local teacher. The conductor said the echo under the glass roof was difficult, but that nobody complained about the audience.

@highlight

A winter concert among the commuters
