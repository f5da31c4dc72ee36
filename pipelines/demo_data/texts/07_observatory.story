Members of the amateur astronomy club opened the observatory on the ridge for a public night. Under a clear sky, visitors queued for the telescope to see the rings of Saturn and a faint smudge that the club's treasurer explained was a galaxy millions of light years away. Hot chocolate ran out before midnight.

@highlight

A clear night at the ridge observatory
