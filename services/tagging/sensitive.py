"""Sensitive categories no tag may infer, and the screening of words that would reveal them.

The built-in list is the union of GDPR Art. 9 (special categories), PIPL Art. 28 (sensitive
personal information) and the CPRA's sensitive personal information, plus GDPR Art. 10 (criminal
convictions). An operator may ban more categories and add screening terms, never remove these.

Screening matches whole words, case-insensitively: a text is split into words at anything that
is not a letter or digit (so ``_`` and ``-`` in tag ids separate words), and a term matches the
same word sequence, its last word optionally followed by ``s`` or ``es`` (``immigrants``). Terms
are deliberately broad; a false alarm costs a rename, a miss exposes people.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final


@dataclass(frozen=True, slots=True)
class SensitiveCategory:
    """A category of inference that tags must never make."""

    id: str
    """Stable lower-snake-case id, e.g. ``health``."""
    label: str
    law: str
    """Where the ban comes from (for error messages), or ``operator`` for extras."""
    terms: tuple[str, ...]
    """Words or phrases that reveal an inference of this category."""


def _terms(listed: str) -> tuple[str, ...]:
    return tuple(term.strip() for term in listed.split(",") if term.strip())


BUILTIN_CATEGORIES: Final[tuple[SensitiveCategory, ...]] = (
    SensitiveCategory(
        "racial_or_ethnic_origin",
        "racial or ethnic origin",
        "GDPR Art. 9, CPRA",
        _terms(
            "race, racial, ethnic, ethnicity, ethnic origin, ethnic minority, skin colour, "
            "skin color, african american, hispanic, latino, latina, latinx, caucasian, "
            "arab, romani, gypsy, aboriginal, indigenous"
        ),
    ),
    SensitiveCategory(
        "political_opinions",
        "political opinions",
        "GDPR Art. 9",
        _terms(
            "political, politics, politician, democrat, republican, socialist, communist, "
            "leftist, left wing, right wing, far right, far left, tory, libertarian, "
            "green party, party member, voter, voting, election, activist"
        ),
    ),
    SensitiveCategory(
        "religious_or_philosophical_beliefs",
        "religious or philosophical beliefs",
        "GDPR Art. 9, PIPL Art. 28, CPRA",
        _terms(
            "religion, religious, faith, belief, church, mosque, synagogue, christian, "
            "christianity, catholic, protestant, evangelical, mormon, jehovah, islam, "
            "islamic, muslim, halal, kosher, jewish, judaism, jew, hindu, hinduism, "
            "buddhist, buddhism, sikh, sikhism, atheist, atheism, agnostic, ramadan, "
            "bible, quran, koran, torah, prayer, spiritual, scientology, pagan, wiccan"
        ),
    ),
    SensitiveCategory(
        "trade_union_membership",
        "trade-union membership",
        "GDPR Art. 9, CPRA",
        _terms(
            "trade union, labor union, labour union, union member, union membership, "
            "unionist, unionised, unionized, union dues, shop steward"
        ),
    ),
    SensitiveCategory(
        "genetic",
        "genetic data",
        "GDPR Art. 9, CPRA",
        _terms("genetic, genetics, gene, genome, genomic, dna, hereditary, ancestry, 23andme"),
    ),
    SensitiveCategory(
        "biometric",
        "biometric data",
        "GDPR Art. 9, PIPL Art. 28, CPRA",
        _terms(
            "biometric, biometrics, fingerprint, face recognition, facial recognition, "
            "iris scan, retina, voiceprint, face id"
        ),
    ),
    SensitiveCategory(
        "health",
        "health",
        "GDPR Art. 9, PIPL Art. 28, CPRA",
        _terms(
            "health, medical, illness, disease, diagnosis, pregnancy, pregnant, prenatal, "
            "maternity, fertility, ivf, miscarriage, abortion, contraception, "
            "contraceptive, diabetes, diabetic, cancer, oncology, chemotherapy, tumour, "
            "tumor, hiv, std, depression, depressed, anxiety, mental illness, psychiatric, "
            "bipolar, schizophrenia, adhd, autism, autistic, dementia, alzheimer, "
            "alzheimers, parkinson, parkinsons, epilepsy, asthma, allergy, allergies, "
            "disability, disabled, wheelchair, medication, prescription, addiction, "
            "alcoholism, rehab, obesity, obese, weight loss, incontinence, hearing loss, "
            "eating disorder"
        ),
    ),
    SensitiveCategory(
        "sex_life_or_sexual_orientation",
        "sex life or sexual orientation",
        "GDPR Art. 9, CPRA",
        _terms(
            "sex, sexual, sexuality, sex life, sexual orientation, gay, lesbian, bisexual, "
            "homosexual, heterosexual, queer, lgbt, lgbtq, lgbtqia, transgender, "
            "transsexual, nonbinary, non binary, intersex, asexual, sex toy, adult toy, "
            "erotic, fetish, condom, swinger, polyamorous"
        ),
    ),
    SensitiveCategory(
        "financial_accounts",
        "financial accounts",
        "PIPL Art. 28, CPRA",
        _terms(
            "bank account, account number, iban, credit card, debit card, card number, "
            "routing number, sort code, financial account, bankruptcy, bankrupt, "
            "insolvency, insolvent, overdraft, credit score, creditworthiness, password, "
            "credentials"
        ),
    ),
    SensitiveCategory(
        "precise_location",
        "whereabouts or precise location",
        "PIPL Art. 28, CPRA",
        _terms(
            "precise location, whereabouts, geolocation, gps, home address, coordinates, "
            "latitude, longitude, location history, home location"
        ),
    ),
    SensitiveCategory(
        "minors",
        "minors under 14",
        "PIPL Art. 28",
        _terms(
            "child, children, kid, kids, minor, underage, under 13, under 14, under 16, "
            "toddler, infant, newborn, preteen, tween, schoolchild, schoolkid"
        ),
    ),
    SensitiveCategory(
        "government_ids",
        "government identifiers",
        "CPRA",
        _terms(
            "social security, ssn, passport, driver license, drivers license, "
            "driving licence, national id, national insurance, tax id, identity card, "
            "id card, id number"
        ),
    ),
    SensitiveCategory(
        "citizenship_or_immigration_status",
        "citizenship or immigration status",
        "CPRA",
        _terms(
            "citizenship, immigrant, immigration, migrant, refugee, asylum, asylum seeker, "
            "undocumented, illegal alien, visa status, work permit, residency status, "
            "green card, deportation, nationality, foreigner, expat, expatriate"
        ),
    ),
    SensitiveCategory(
        "communications_content",
        "contents of mail, email and text messages",
        "CPRA",
        _terms("email content, message content, private messages, text messages"),
    ),
    SensitiveCategory(
        "neural_data",
        "neural data",
        "CPRA",
        _terms("neural, brain activity, eeg, neurodata"),
    ),
    SensitiveCategory(
        "criminal_record",
        "criminal convictions and offences",
        "GDPR Art. 10",
        _terms(
            "criminal, conviction, convicted, offender, arrest, arrested, prison, inmate, "
            "parole, probation, felon, felony"
        ),
    ),
)

_WORD: Final = re.compile(r"[^\W_]+")
_CATEGORY_ID: Final = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """The words screening sees: letters and digits, case-folded, split at anything else."""
    return _WORD.findall(text.casefold())


def normalise_category(name: str) -> str:
    """``Sexual Orientation`` and ``sexual-orientation`` both become ``sexual_orientation``."""
    return "_".join(words(name))


@dataclass(frozen=True, slots=True)
class Finding:
    """A sensitive term found in a text."""

    category: str
    term: str
    """The term as listed, e.g. ``kid``."""
    law: str
    matched: str
    """The words as they appear in the text, e.g. ``kids``."""


class SensitiveScreen:
    """The banned categories in force (built-in plus the operator's) and their screening terms."""

    def __init__(self, categories: Iterable[SensitiveCategory]) -> None:
        merged: dict[str, SensitiveCategory] = {}
        for category in categories:
            known = merged.get(category.id)
            if known is None:
                merged[category.id] = category
            else:
                terms = tuple(dict.fromkeys(known.terms + category.terms))
                merged[category.id] = SensitiveCategory(known.id, known.label, known.law, terms)
        self.categories: Mapping[str, SensitiveCategory] = merged
        self._phrases: dict[tuple[str, ...], Finding] = {}
        for category in merged.values():
            for term in (*category.terms, category.id.replace("_", " ")):
                phrase = tuple(words(term))
                if not phrase:
                    continue
                *head, last = phrase
                for variant in (last, last + "s", last + "es"):
                    self._phrases.setdefault(
                        (*head, variant),
                        Finding(category.id, " ".join(phrase), category.law, ""),
                    )
        self._longest = max((len(phrase) for phrase in self._phrases), default=1)

    def screen(self, text: str) -> list[Finding]:
        """Sensitive terms in ``text``, in order of appearance, each once."""
        found: dict[tuple[str, str], Finding] = {}
        tokens = words(text)
        start = 0
        while start < len(tokens):
            step = 1
            for length in range(min(self._longest, len(tokens) - start), 0, -1):
                phrase = tuple(tokens[start : start + length])
                finding = self._phrases.get(phrase)
                if finding is not None:
                    matched = replace(finding, matched=" ".join(phrase))
                    found.setdefault((finding.category, finding.term), matched)
                    step = length
                    break
            start += step
        return list(found.values())

    def banned_category(self, name: str) -> SensitiveCategory | None:
        """The banned category ``name`` is, or reveals (e.g. ``religion``), if any."""
        normalised = normalise_category(name)
        category = self.categories.get(normalised)
        if category is not None:
            return category
        findings = self.screen(name)
        return self.categories[findings[0].category] if findings else None


def operator_category(id: str, terms: Iterable[str] = ()) -> SensitiveCategory:
    """A category an operator bans; its id is screened as a term too."""
    normalised = normalise_category(id)
    if not _CATEGORY_ID.fullmatch(normalised):
        raise ValueError(f"banned category {id!r} is not a name")
    label = normalised.replace("_", " ")
    return SensitiveCategory(normalised, label, "banned by the operator", tuple(terms))


def sensitive_screen(extra: Iterable[SensitiveCategory | str] = ()) -> SensitiveScreen:
    """The built-in categories plus ``extra``; an extra with a built-in id only adds terms."""
    extras = [operator_category(e) if isinstance(e, str) else e for e in extra]
    return SensitiveScreen((*BUILTIN_CATEGORIES, *extras))


BUILTIN_SCREEN: Final = sensitive_screen()


def screen(text: str) -> list[tuple[str, str]]:
    """``(category, term)`` for each built-in sensitive term in ``text``."""
    return [(finding.category, finding.term) for finding in BUILTIN_SCREEN.screen(text)]
